"""Serving without Ray: the OpenAI API's request checks and response shapes (openai.py) and the
generation backends (backends.py). The Ray Serve deployment is actors/server.py."""
