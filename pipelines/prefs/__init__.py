"""prefs"""
