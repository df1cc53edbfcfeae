"""Networks a user might bring, importable in the tests as `user_models.vit:TinyViT` and the like."""
