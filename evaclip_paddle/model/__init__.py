"""EVA-CLIP towers in Paddle."""
