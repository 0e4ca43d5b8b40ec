from flashserve.dashboard.results_page import render

render()
