"""csmcli: command-line text-to-speech with Sesame's CSM-1B."""

__version__ = "0.1.0"
