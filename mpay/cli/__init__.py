"""Command-line programs: mpay-admin (ledger), mpay-dmd (device), mpay-load (capacity)."""
