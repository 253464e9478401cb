"""TLS for the listeners: certificate values, the policy, the SNI map, the TLS protocol."""
