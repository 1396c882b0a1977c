"""Coverage-guided fuzzing harnesses (atheris) for the parsers that read hostile bytes.

``python -m fuzz.run`` (``make fuzz``) runs each harness for a set time; docs/reliability.md
("Fuzzing and coverage") records the long runs and what they found.
"""
