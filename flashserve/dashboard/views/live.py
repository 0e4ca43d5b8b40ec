from flashserve.dashboard.live_page import render

render()
