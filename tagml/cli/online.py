"""`tagml online refresh|status`: the online tag store the API reads."""
