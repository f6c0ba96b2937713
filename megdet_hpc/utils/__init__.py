"""Small shared utilities: logging and progress bars, the command-line error path, user errors."""
