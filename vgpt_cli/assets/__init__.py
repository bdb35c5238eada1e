"""Small files shipped with vgpt: the demo photograph (CC0)."""
