"""compeft"""
