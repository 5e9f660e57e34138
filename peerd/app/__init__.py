"""What a user runs: share a file, get one, the long-running daemon, progress."""
