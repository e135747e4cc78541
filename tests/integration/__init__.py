"""Tests against real peers on 127.0.0.1: the lab, bridges, Pebble, subprocesses."""
