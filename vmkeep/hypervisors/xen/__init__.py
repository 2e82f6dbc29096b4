"""Citrix XenServer / XCP-ng pools through XAPI (the official XenAPI SDK)."""
