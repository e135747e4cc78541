output "public_ip" {
  description = "Static public IPv4 address of the bridge."
  value       = azurerm_public_ip.bridge.ip_address
}

output "dns_record" {
  description = "The DNS record that must point the bridge's name at it (created by Terraform when dns_zone_name is set)."
  value = {
    name                 = var.fqdn
    type                 = "A"
    value                = azurerm_public_ip.bridge.ip_address
    ttl                  = var.dns_ttl
    created_by_terraform = var.dns_zone_name != null
    zone_file_line       = "${var.fqdn}. ${var.dns_ttl} IN A ${azurerm_public_ip.bridge.ip_address}"
  }
}

output "ssh_command" {
  description = "SSH command for the VM (from an address in admin_cidrs, with the key matching ssh_public_key)."
  value       = "ssh ${var.admin_username}@${azurerm_public_ip.bridge.ip_address}"
}

output "next_steps" {
  description = "What to do after terraform apply."
  value       = <<-EOT
    1. DNS: ${var.dns_zone_name != null ? "the A record ${var.fqdn} -> ${azurerm_public_ip.bridge.ip_address} was created in the Azure DNS zone ${var.dns_zone_name}." : "create the A record  ${var.fqdn}. ${var.dns_ttl} IN A ${azurerm_public_ip.bridge.ip_address}  at the DNS provider of ${var.fqdn}."}
       Check: dig +short ${var.fqdn}   (must print ${azurerm_public_ip.bridge.ip_address})
    2. Wait for the installation (a few minutes after the first boot):
         ssh ${var.admin_username}@${azurerm_public_ip.bridge.ip_address} sudo cloud-init status --wait
    3. If the bridge started before the name resolved, it stops after 3 tries (to spare Let's Encrypt's
       limits); once dig prints the address, start it again:
         ssh ${var.admin_username}@${azurerm_public_ip.bridge.ip_address} 'sudo systemctl reset-failed exchange-bridge; sudo systemctl restart exchange-bridge'
       Follow it with: sudo journalctl -u exchange-bridge -f
    4. Check the legacy server and the bridge before creating the batch:
         ssh ${var.admin_username}@${azurerm_public_ip.bridge.ip_address} sudo bridge preflight --config /etc/exchange-bridge/bridge.toml
    5. In Exchange Online, create the Outlook Anywhere migration endpoint with RPC proxy server ${var.fqdn}
       and run the cutover batch.
    6. After the migration: terraform destroy${var.dns_zone_name != null ? "" : ", and delete the A record of ${var.fqdn}"}.
  EOT
}
