"""Images in: safe decoding, ingesting uploads, zips and folders, datasets (built-in and
imported) and their pixels."""
