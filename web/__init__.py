"""The web process: the composition root that mounts the receiver and the ops tools.

``app.create_app(settings)`` builds it; ``wsgi`` is gunicorn's entry module, ``serve`` the
Procfile's (``python -m web.serve``), ``gunicorn`` the server's settings.
"""
