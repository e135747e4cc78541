# ----------------------------------------------------------------------------- the bridge

variable "fqdn" {
  description = "Public name of the bridge, e.g. bridge.contoso.com: the RPC proxy server given to Exchange Online and the name of its Let's Encrypt certificate. Lower case, at least two labels."
  type        = string

  validation {
    condition     = length(var.fqdn) <= 253 && can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", var.fqdn))
    error_message = "The fqdn must be a fully qualified domain name in lower case, such as bridge.contoso.com (no IP address, no trailing dot)."
  }
}

variable "legacy_hosts" {
  description = "The Exchange 2007 Client Access server(s) the bridge forwards to, as HOST or HOST:PORT (default port 443), e.g. [\"mail.contoso.com\"] or [\"203.0.113.10:443\"]. Must be reachable from Azure."
  type        = list(string)

  validation {
    condition     = length(var.legacy_hosts) > 0 && alltrue([for h in var.legacy_hosts : can(regex("^(\\[[0-9a-fA-F:.]+\\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(:[0-9]{1,5})?$", h))])
    error_message = "Give at least one legacy host, each as HOST or HOST:PORT, e.g. mail.contoso.com or 203.0.113.10:443 ([2001:db8::10]:443 for IPv6)."
  }
}

variable "legacy_fingerprint" {
  description = "Optional SHA-256 fingerprint of the legacy server's certificate (sha256:HEX, as printed by `bridge preflight`), pinned by the bridge. Empty: not pinned."
  type        = string
  default     = ""

  validation {
    condition     = var.legacy_fingerprint == "" || can(regex("^(sha256:)?[0-9A-Fa-f]{2}(:?[0-9A-Fa-f]{2}){31}$", var.legacy_fingerprint))
    error_message = "The legacy_fingerprint must be sha256: followed by 64 hex digits (colons allowed), or empty."
  }
}

variable "acme_email" {
  description = "Contact e-mail for the Let's Encrypt account of the bridge."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9.!#$%&*+/=?^_`{|}~-]+@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.)+[A-Za-z]{2,63}$", var.acme_email))
    error_message = "The acme_email must be an e-mail address such as it@contoso.com."
  }
}

variable "acme_directory" {
  description = "ACME server: letsencrypt (default), letsencrypt-staging (for a dry run: untrusted certificate, generous limits) or an https:// directory URL."
  type        = string
  default     = "letsencrypt"

  validation {
    condition     = can(regex("^(letsencrypt|letsencrypt-staging|https://[^[:space:]\"\\\\]+)$", var.acme_directory))
    error_message = "The acme_directory must be letsencrypt, letsencrypt-staging or an https:// URL."
  }
}

variable "bridge_package" {
  description = "What pip installs on the VM (a pip requirement spec): a released version such as \"exchange-bridge==0.1.0\", a git URL such as \"exchange-bridge @ git+https://github.com/ORG/exchange-bridge@v0.1.0\", or a wheel URL."
  type        = string

  validation {
    condition     = length(trimspace(var.bridge_package)) > 0 && !startswith(trimspace(var.bridge_package), "-") && !can(regex("[\\r\\n]", var.bridge_package))
    error_message = "The bridge_package must be one pip requirement (a name with version, a git URL or a wheel URL) on one line, not a pip option."
  }
}

variable "expire_at" {
  description = "End of the migration window: an ISO 8601 date (the end of that day, UTC) or date-time (UTC unless it names a zone), e.g. 2025-07-01 or 2025-07-01T18:00Z. Then the bridge stops forwarding (503) but keeps its status page, port 80 and renewal; extend it in /etc/exchange-bridge/bridge.toml and `systemctl reload exchange-bridge`. Empty: no end date (see expire_after)."
  type        = string
  default     = ""

  validation {
    condition     = var.expire_at == "" || can(regex("^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2})?(Z|[+-][0-9]{2}:[0-9]{2})?)?$", var.expire_at))
    error_message = "The expire_at must be an ISO 8601 date or date-time such as 2025-07-01 or 2025-07-01T18:00Z, or empty."
  }
}

variable "expire_after" {
  description = "Length of the migration window counted from the bridge's first start on the VM (kept in its state directory, so restarts do not extend it), e.g. 14d or 72h. Empty: no end (the bridge logs a recommendation). Give expire_at or expire_after, not both."
  type        = string
  default     = ""

  validation {
    condition     = var.expire_after == "" || can(regex("^([0-9]+[smhdw])+$", var.expire_after))
    error_message = "The expire_after must be a duration such as 14d, 72h or 90m, or empty."
  }

  validation {
    condition     = var.expire_after == "" || var.expire_at == ""
    error_message = "Give expire_at or expire_after, not both: each sets the end of the migration window."
  }
}

# ----------------------------------------------------------------------------- network access

variable "allowed_cidrs" {
  description = "Sources allowed to reach HTTPS (443). Default: anywhere, because Exchange Online connects from many Microsoft 365 address ranges; narrow it to those ranges if you keep them current, or set https_from_exchange_online and list only your own address here."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = (length(var.allowed_cidrs) > 0 || var.https_from_exchange_online) && alltrue([for c in var.allowed_cidrs : can(cidrhost(c, 0)) && try(cidrhost(c, 0) == split("/", c)[0], false)])
    error_message = "Each entry of allowed_cidrs must be a CIDR block written with its network address, e.g. 0.0.0.0/0 or 40.92.0.0/15."
  }

  validation {
    condition     = !var.https_from_exchange_online || !contains(var.allowed_cidrs, "0.0.0.0/0")
    error_message = "With https_from_exchange_online, allowed_cidrs adds sources beside Exchange Online's ranges: give your own address (e.g. [\"198.51.100.7/32\"]) or [] instead of 0.0.0.0/0."
  }
}

variable "https_from_exchange_online" {
  description = "Open HTTPS (443) in the network security group only to Exchange Online's published IPv4 ranges (the package's snapshot, bridge/ops/data/exchange-online.json, dated inside it) plus allowed_cidrs. Off by default. The snapshot changes only with the package: re-apply after upgrading it, and compare with `bridge allow show` after `bridge allow refresh` on the VM."
  type        = bool
  default     = false
}

variable "admin_cidrs" {
  description = "Sources allowed to reach SSH (22), e.g. [\"198.51.100.7/32\"] for your own public address. Required: there is no default, and a /0 (the whole internet) is refused."
  type        = list(string)

  validation {
    condition     = length(var.admin_cidrs) > 0 && alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0)) && try(cidrhost(c, 0) == split("/", c)[0], false)])
    error_message = "Give at least one CIDR block for SSH, written with its network address, e.g. 198.51.100.7/32 (see: curl -s https://api.ipify.org)."
  }

  validation {
    condition     = alltrue([for c in var.admin_cidrs : !endswith(c, "/0")])
    error_message = "SSH is not opened to the whole internet: give your own address or range in admin_cidrs, e.g. 198.51.100.7/32."
  }
}

# ----------------------------------------------------------------------------- Azure

variable "subscription_id" {
  description = "Azure subscription to deploy into (a GUID). Null: taken from the ARM_SUBSCRIPTION_ID environment variable, which the azurerm 4 provider then requires (export ARM_SUBSCRIPTION_ID=$(az account show --query id -o tsv))."
  type        = string
  default     = null

  validation {
    condition     = var.subscription_id == null || can(regex("^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", var.subscription_id))
    error_message = "The subscription_id must be a GUID such as 00000000-0000-0000-0000-000000000000, or null."
  }
}

variable "location" {
  description = "Azure region, e.g. westeurope, northeurope, eastus. Choose one in the customer's geography: every mailbox passes through this VM in clear."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9]+$", var.location))
    error_message = "The location must be an Azure region name such as westeurope (lower case, no spaces; see az account list-locations -o table)."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name (resource group <prefix>-rg, VM <prefix>-vm, ...)."
  type        = string
  default     = "exchange-bridge"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,38}[a-z0-9]$", var.name_prefix))
    error_message = "The name_prefix must be 3-40 lower-case letters, digits and hyphens, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource (e.g. customer, owner, delete-after)."
  type        = map(string)
  default     = {}
}

variable "vnet_cidr" {
  description = "Address space of the virtual network; the bridge's subnet is its first half."
  type        = string
  default     = "10.42.0.0/24"

  validation {
    condition     = can(cidrsubnet(var.vnet_cidr, 1, 0)) && try(cidrhost(var.vnet_cidr, 0) == split("/", var.vnet_cidr)[0], false)
    error_message = "The vnet_cidr must be an IPv4 CIDR block of /28 or larger written with its network address, e.g. 10.42.0.0/24."
  }
}

variable "vm_size" {
  description = "VM size. Standard_B2s (2 vCPU, 4 GiB, burstable) carries a migration batch comfortably: the bridge only relays TLS. See docs/deploy.md for the cost."
  type        = string
  default     = "Standard_B2s"

  validation {
    condition     = can(regex("^Standard_[A-Za-z0-9_]+$", var.vm_size))
    error_message = "The vm_size must be an Azure VM size such as Standard_B2s (see az vm list-sizes --location <region>)."
  }
}

variable "os_image" {
  description = "Operating system of the VM: debian-12 (default) or ubuntu-24.04. Both ship Python 3.11 or newer, which the bridge needs."
  type        = string
  default     = "debian-12"

  validation {
    condition     = contains(["debian-12", "ubuntu-24.04"], var.os_image)
    error_message = "The os_image must be debian-12 or ubuntu-24.04."
  }
}

variable "os_disk_type" {
  description = "Storage type of the OS disk (30 GiB): StandardSSD_LRS (default), Standard_LRS or Premium_LRS."
  type        = string
  default     = "StandardSSD_LRS"

  validation {
    condition     = contains(["Standard_LRS", "StandardSSD_LRS", "Premium_LRS"], var.os_disk_type)
    error_message = "The os_disk_type must be Standard_LRS, StandardSSD_LRS or Premium_LRS."
  }
}

variable "admin_username" {
  description = "Login of the administrator account on the VM (SSH key only, sudo)."
  type        = string
  default     = "bridgeadmin"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_-]{0,31}$", var.admin_username)) && !contains(["admin", "administrator", "root", "user", "guest", "test", "sys", "daemon", "exchange-bridge"], var.admin_username)
    error_message = "The admin_username must be a lower-case Linux login (up to 32 characters) and not a reserved name such as root or admin."
  }
}

variable "ssh_public_key" {
  description = "SSH public key for admin_username (the contents of e.g. ~/.ssh/id_ed25519.pub). Password login is disabled."
  type        = string

  validation {
    condition     = can(regex("^(ssh-rsa|ssh-ed25519) [A-Za-z0-9+/]+={0,3}( [^\\r\\n]*)?\\s*$", var.ssh_public_key))
    error_message = "The ssh_public_key must be one OpenSSH public key line starting with ssh-ed25519 or ssh-rsa (Azure accepts no other types)."
  }
}

# ----------------------------------------------------------------------------- optional Azure DNS

variable "dns_zone_name" {
  description = "Optional Azure DNS zone holding fqdn (e.g. contoso.com). When given, Terraform creates the A record itself; otherwise create it at your DNS provider (see the dns_record output)."
  type        = string
  default     = null

  validation {
    condition     = var.dns_zone_name == null || can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", var.dns_zone_name))
    error_message = "The dns_zone_name must be a DNS zone name in lower case such as contoso.com, or null."
  }

  validation {
    condition     = try(var.fqdn == var.dns_zone_name || endswith(var.fqdn, ".${var.dns_zone_name}"), var.dns_zone_name == null)
    error_message = "The fqdn must lie inside dns_zone_name (bridge.contoso.com in contoso.com)."
  }
}

variable "dns_zone_resource_group_name" {
  description = "Resource group of the Azure DNS zone dns_zone_name (it is not created or changed otherwise). Required with dns_zone_name."
  type        = string
  default     = null

  validation {
    condition     = (var.dns_zone_name == null) == (var.dns_zone_resource_group_name == null)
    error_message = "Give dns_zone_resource_group_name together with dns_zone_name, and neither without the other."
  }
}

variable "dns_ttl" {
  description = "TTL in seconds of the A record created in Azure DNS."
  type        = number
  default     = 300

  validation {
    condition     = var.dns_ttl >= 30 && var.dns_ttl <= 86400
    error_message = "The dns_ttl must be between 30 and 86400 seconds."
  }
}
