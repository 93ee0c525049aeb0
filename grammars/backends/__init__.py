"""Grammar backend implementations (imported lazily through sgl.grammars.base.get_backend)."""
