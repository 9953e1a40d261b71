"""Drop-in adapters that give other libraries' merge functions our kernels (see the README)."""
