"""The server side: keys, package building, signing, publishing and a development server."""
