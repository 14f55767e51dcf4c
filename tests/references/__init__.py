"""Float64 numpy re-expressions of the authors' own optimizer code, used as test references."""
