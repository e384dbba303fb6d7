"""Development-only tools: `make install` installs this package, the images
never do, and no production code path imports it (records' playground does
only when it is enabled, that is RAILS_ENV is not production)."""
