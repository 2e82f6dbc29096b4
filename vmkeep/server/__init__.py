"""The master server: REST API over the catalog, with authentication, roles and an audit log."""
