"""The bottom layer: settings, storage plumbing and process set-up. Imports nothing else of tagml."""
