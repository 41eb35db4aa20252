"""What every command-line job does around its work: its console, its config tree, its user errors."""
