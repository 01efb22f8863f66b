"""Worker tier: edit algorithms, guards, model I/O and (later) Ray actors. Imports shared/, never controller/."""
