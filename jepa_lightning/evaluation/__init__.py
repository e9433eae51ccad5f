"""Evaluation: result tables and the runners that produce them."""
