"""The live model state: the jobs' serving statistics from the state topic, over HTTP.

``view`` (pure answers), ``feed`` (Kafka), ``app`` (WSGI and ``page.html``) and ``service``
(``StateService``, the lifecycle); ``modelserving.cli.state`` is the command. Nothing is
imported here, so that the pure view can be used without werkzeug or kafka-python loaded.
"""
