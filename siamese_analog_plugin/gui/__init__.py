"""The map-canvas face of the plugin: draw an area (or pick selected polygons) and search it.

``actions.AnalogGui`` owns the toolbar/menu actions, ``map_tool.AreaMapTool`` draws the
polygon, ``area_layer`` keeps the temporary area layer, ``parameters`` builds the Processing
dialog's parameters and ``settings`` remembers the last-used reference and settings.
"""
