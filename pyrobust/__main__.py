from pyrobust.cli import run

run()
