locals {
  tags = merge({ application = "exchange-bridge", fqdn = var.fqdn }, var.tags)

  images = {
    "debian-12"    = { publisher = "Debian", offer = "debian-12", sku = "12-gen2" }
    "ubuntu-24.04" = { publisher = "Canonical", offer = "ubuntu-24_04-lts", sku = "server" }
  }

  # HTTPS sources of the network security group: allowed_cidrs, and with https_from_exchange_online
  # Exchange Online's published IPv4 ranges from the package's snapshot (the public IP is IPv4 only).
  exchange_online_ranges = [for cidr in jsondecode(file("${path.module}/../../bridge/ops/data/exchange-online.json")).ranges : cidr if !strcontains(cidr, ":")]
  https_sources          = var.https_from_exchange_online ? distinct(concat(local.exchange_online_ranges, var.allowed_cidrs)) : var.allowed_cidrs

  # Name of the A record inside the zone: "@" for the zone apex.
  dns_record_name = var.dns_zone_name == null ? null : (var.fqdn == var.dns_zone_name ? "@" : trimsuffix(var.fqdn, ".${var.dns_zone_name}"))
}

resource "azurerm_resource_group" "bridge" {
  name     = "${var.name_prefix}-rg"
  location = var.location
  tags     = local.tags
}

resource "azurerm_virtual_network" "bridge" {
  name                = "${var.name_prefix}-vnet"
  location            = azurerm_resource_group.bridge.location
  resource_group_name = azurerm_resource_group.bridge.name
  address_space       = [var.vnet_cidr]
  tags                = local.tags
}

resource "azurerm_subnet" "bridge" {
  name                 = "${var.name_prefix}-subnet"
  resource_group_name  = azurerm_resource_group.bridge.name
  virtual_network_name = azurerm_virtual_network.bridge.name
  address_prefixes     = [cidrsubnet(var.vnet_cidr, 1, 0)]
}

resource "azurerm_network_security_group" "bridge" {
  #checkov:skip=CKV_AZURE_160:Port 80 must be open to the internet: Let's Encrypt's HTTP-01 validation comes from unpublished, changing addresses; the bridge serves only ACME challenges and redirects there.
  name                = "${var.name_prefix}-nsg"
  location            = azurerm_resource_group.bridge.location
  resource_group_name = azurerm_resource_group.bridge.name
  tags                = local.tags

  # Exchange Online's migration service (and users, if wanted) reach the bridge over TLS 1.2/1.3.
  security_rule {
    name                       = "allow-https"
    description                = "HTTPS to the bridge from allowed_cidrs (and Exchange Online with https_from_exchange_online)"
    priority                   = 100
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_port_range          = "*"
    destination_port_range     = "443"
    source_address_prefixes    = local.https_sources
    destination_address_prefix = "*"
  }

  # Let's Encrypt validates HTTP-01 from addresses it does not publish, so port 80 is open to all.
  # The bridge answers there only ACME challenges and redirects to HTTPS.
  security_rule {
    name                       = "allow-http-acme"
    description                = "ACME HTTP-01 validation and redirects to HTTPS, from anywhere"
    priority                   = 110
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_port_range          = "*"
    destination_port_range     = "80"
    source_address_prefix      = "*"
    destination_address_prefix = "*"
  }

  security_rule {
    name                       = "allow-ssh-admin"
    description                = "SSH from admin_cidrs only"
    priority                   = 120
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_port_range          = "*"
    destination_port_range     = "22"
    source_address_prefixes    = var.admin_cidrs
    destination_address_prefix = "*"
  }

  # Everything else from the internet is refused by Azure's default DenyAllInBound rule; the bridge's
  # status listener (127.0.0.1:8404) is on loopback and needs no rule.
}

resource "azurerm_subnet_network_security_group_association" "bridge" {
  subnet_id                 = azurerm_subnet.bridge.id
  network_security_group_id = azurerm_network_security_group.bridge.id
}

resource "azurerm_public_ip" "bridge" {
  name                = "${var.name_prefix}-ip"
  location            = azurerm_resource_group.bridge.location
  resource_group_name = azurerm_resource_group.bridge.name
  allocation_method   = "Static"
  sku                 = "Standard"
  ip_version          = "IPv4"
  tags                = local.tags
}

resource "azurerm_network_interface" "bridge" {
  #checkov:skip=CKV_AZURE_119:The bridge is an internet-facing endpoint: Exchange Online must reach it on a public address.
  name                = "${var.name_prefix}-nic"
  location            = azurerm_resource_group.bridge.location
  resource_group_name = azurerm_resource_group.bridge.name
  tags                = local.tags

  ip_configuration {
    name                          = "primary"
    subnet_id                     = azurerm_subnet.bridge.id
    private_ip_address_allocation = "Dynamic"
    public_ip_address_id          = azurerm_public_ip.bridge.id
  }
}

resource "azurerm_linux_virtual_machine" "bridge" {
  name                            = "${var.name_prefix}-vm"
  computer_name                   = substr(var.name_prefix, 0, 63)
  location                        = azurerm_resource_group.bridge.location
  resource_group_name             = azurerm_resource_group.bridge.name
  size                            = var.vm_size
  admin_username                  = var.admin_username
  disable_password_authentication = true
  network_interface_ids           = [azurerm_network_interface.bridge.id]
  custom_data                     = base64encode(local.cloud_init)
  provision_vm_agent              = true
  allow_extension_operations      = false
  tags                            = local.tags

  admin_ssh_key {
    username   = var.admin_username
    public_key = trimspace(var.ssh_public_key)
  }

  os_disk {
    name                 = "${var.name_prefix}-osdisk"
    caching              = "ReadWrite"
    storage_account_type = var.os_disk_type
  }

  source_image_reference {
    publisher = local.images[var.os_image].publisher
    offer     = local.images[var.os_image].offer
    sku       = local.images[var.os_image].sku
    version   = "latest"
  }

  # Serial log and screenshot in the portal (managed storage), to see a VM that does not boot.
  boot_diagnostics {}

  lifecycle {
    # Changing custom_data would rebuild the VM (new disk, new certificate) in the middle of a
    # migration. Upgrade in place instead (docs/deploy.md), or rebuild on purpose with
    # terraform apply -replace=azurerm_linux_virtual_machine.bridge
    ignore_changes = [custom_data]
  }
}

resource "azurerm_dns_a_record" "bridge" {
  count               = var.dns_zone_name == null ? 0 : 1
  name                = local.dns_record_name
  zone_name           = var.dns_zone_name
  resource_group_name = var.dns_zone_resource_group_name
  ttl                 = var.dns_ttl
  target_resource_id  = azurerm_public_ip.bridge.id
  tags                = local.tags
}
