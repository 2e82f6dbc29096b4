"""Backup and restore runners: given a data source/target and a repository, move the bytes."""
