"""The Hugging Face Hub and its local cache: find, list, plan and download models.

``resolve`` turns a Hub id or folder into the folder to open, ``cache`` is the local
cache's layout (huggingface_hub's own helpers), ``catalogue`` the curated models,
``listing`` every model with its verdict (what `mlx-pager models` and the Models screen
show), ``plan`` what a download costs, ``fetch`` the resumable download, ``errors`` what
can go wrong, said so that the user knows what to do.
"""
