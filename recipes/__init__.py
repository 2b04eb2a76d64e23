"""Built-in recipes: YAML files read by ``xmodal run NAME`` (see ``xmodal recipes``)."""
