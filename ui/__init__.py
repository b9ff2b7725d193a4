"""The usage pages (``/ui``): operators' overview and subject pages, an end user's portal page and an
embeddable widget, all answered from the public API in the browser."""
