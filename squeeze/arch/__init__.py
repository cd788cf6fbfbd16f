"""Model-family adapters: everything squeeze knows about one architecture lives in that family's file."""
