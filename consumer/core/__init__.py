"""Sans-I/O core: pure encoding, decoding and decisions. Nothing here imports asyncio."""
