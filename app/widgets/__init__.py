"""Widgets of the mlx-pager app."""
