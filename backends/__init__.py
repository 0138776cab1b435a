"""Everything that touches a model: loading, running, accelerating."""
