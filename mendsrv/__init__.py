"""mendsrv: the Mend Media Processing Engine."""

__version__ = "0.1.0"
