"""`make bench`: our services against the Node.js originals, same machine, same run."""
