"""The ground floor every package stands on: the user's error, the allowed values of the options with
their checks, and how figures, sizes and durations are written. Standard library only, so that
reading the options or raising an error never starts Ray, torch or matplotlib."""
