from featx.cli import entry

entry()
