# The VM's cloud-init: it writes scripts/install.sh, the systemd unit and constraints.txt beside it onto the VM and
# runs install.sh with the settings below, so a VM built here is installed exactly like one
# installed by hand. Kept apart from the resources so that tests can render it with variables alone.
# constraints.txt pins the bridge's dependency versions; a module copied without it installs unpinned.

locals {
  install_args = concat(
    ["--package", var.bridge_package, "--fqdn", var.fqdn, "--email", var.acme_email, "--acme-directory", var.acme_directory],
    flatten([for host in var.legacy_hosts : ["--legacy", host]]),
    var.legacy_fingerprint == "" ? [] : ["--legacy-fingerprint", var.legacy_fingerprint],
    var.expire_at == "" ? [] : ["--expire-at", var.expire_at],
    var.expire_after == "" ? [] : ["--expire-after", var.expire_after],
  )

  cloud_init = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    install_sh   = file("${path.module}/../../scripts/install.sh")
    unit_file    = file("${path.module}/../../scripts/exchange-bridge.service")
    constraints  = fileexists("${path.module}/../../constraints.txt") ? file("${path.module}/../../constraints.txt") : ""
    install_args = local.install_args
  })
}
