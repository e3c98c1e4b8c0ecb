"""The manager's web console, served at ``/ui``: static files (plain HTML, CSS and ES
modules, no build step, nothing fetched from outside) and the few JSON views the
browser needs that the REST API does not give (``manager.ui.router``).
"""
