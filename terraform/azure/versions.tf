terraform {
  # 1.9 for variable validations that look at other variables (fqdn inside dns_zone_name).
  required_version = ">= 1.9"

  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.0"
    }
  }
}

provider "azurerm" {
  features {}
  # null: taken from ARM_SUBSCRIPTION_ID; azurerm 4 needs one of the two.
  subscription_id = var.subscription_id
}
