"""Screens of the mlx-pager app: chat, conversations, models (downloads), settings."""
