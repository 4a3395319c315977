"""The Processing face: the ``siameseanalog`` provider and one module per algorithm."""
