"""Record-level DP-SGD (Opacus) at each hospital, and the accounting of what it spends."""
