"""Registries of named methods (combine strategies, resize rules): one name each."""
