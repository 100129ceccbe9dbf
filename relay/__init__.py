"""relay: a backup MX that stores mail for its domains and redelivers it to the primary."""
