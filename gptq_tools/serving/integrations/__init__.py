"""Optional integrations with other engines; each imports its engine only inside its own module."""
